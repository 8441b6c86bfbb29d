from dagster_taskiq.cli import main

main()
