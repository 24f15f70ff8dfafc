-- Runs once, when the postgres-data volume is first initialised: POSTGRES_DB creates `mlflow`
-- (MLflow's backend store); Prefect's server gets a database of its own on the same server.
CREATE DATABASE prefect;
