"""The names mlflow_best writes into MLflow (run, version and LoggedModel tags), in one place.

Written by the publisher, read back by ``restore``, ``runs``, ``promote`` and resume. Importing this
module costs nothing (no torch, no MLflow), so ``mlflow-best runs`` needs neither torch nor the
checkpoint format.
"""

TAG = "mlflow_best."
# Tags on each model version; plain keys so they read well in the registry UI.
V_EPOCH, V_MONITOR, V_MODE, V_VALUE, V_SHA, V_RUN = "epoch", "monitor", "mode", "value", "sha256", "run_id"
V_PRUNED = TAG + "pruned"
V_MODEL_ID = TAG + "model_id"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # MLflow's own (mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS)
