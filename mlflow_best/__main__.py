from mlflow_best.cli import main

main(prog_name="mlflow-best")
