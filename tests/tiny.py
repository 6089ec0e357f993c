"""The tiny training the tests start from: cnn5 width 2 on digits, a few seconds on one core."""

TINY_RUN = dict(
    width=2, label_seed=0, epochs=2, batch_size=256, eval_every=1, save_checkpoint=[0], device="cpu"
)
# The same network as `lipdd train` flags, with SGD at a rate that learns in a few epochs.
TINY_FLAGS = "--width 2 --label-seed 0 --batch-size 256 --device cpu --optimizer sgd".split()
TINY_FLAGS += ["--learning-rate", "0.05"]
