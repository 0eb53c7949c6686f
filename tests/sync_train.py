"""`imnet/train.py` with the synchronous reference engine (imnet.engine.sync.SyncDDPEngine) in place of
DDPEngine: `torchrun ... tests/sync_train.py --config ... [overrides]`, for tests/test_async_step.py."""

from imnet import engine, train
from imnet.engine.sync import SyncDDPEngine

if __name__ == "__main__":
    engine.build = lambda cfg, model, d, run_dir=None: SyncDDPEngine(cfg, model, d)
    train.main()
