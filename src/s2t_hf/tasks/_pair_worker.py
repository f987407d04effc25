"""Worker process of [`~s2t_hf.tasks.train_pair`]: trains one model of the pair (`python -m ...tasks._pair_worker`)."""

from s2t_hf.tasks.pair_training import worker_main


if __name__ == "__main__":
    worker_main()
