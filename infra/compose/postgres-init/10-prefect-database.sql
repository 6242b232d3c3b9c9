-- Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d):
-- the Prefect server keeps its own state in a database of its own next to Retrainer's.
CREATE DATABASE prefect OWNER retrainer;
