from mlflow_best.cli import main

main()
