"""The training pipeline: trainable rules, optimizer, jitted steps, sharding, checkpoints,
evaluation, metric writers, and the loop (`trainer.train_and_evaluate`) that ties them."""
