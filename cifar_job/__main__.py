"""python -m cifar_job."""

from cifar_job.cli import main

if __name__ == "__main__":
    main()
