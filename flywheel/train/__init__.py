"""Training: DeepSpeed on Ray Train, tracked in MLflow, exported in Hugging Face format.

`train(profile, dataset_dir, out_dir)` is the stage; `make_plan` is every check that runs
before a worker starts; `train_loop_per_worker` is what each Ray Train worker runs.
"""

from flywheel.train.loop import train_loop_per_worker
from flywheel.train.plan import TrainPlan, make_plan
from flywheel.train.report import TrainResult
from flywheel.train.run import train

__all__ = ["TrainPlan", "TrainResult", "make_plan", "train", "train_loop_per_worker"]
