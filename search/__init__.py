"""Search: data, training, tracking and the Optuna search (`python -m search.run`).

May import `graphs` and `blocks`; never `app`. Heavy dependencies (mlflow, optuna, liger_kernel)
are imported only inside the functions that use them.
"""
