"""Everything a run writes and reads back: its directory (`run_dir`), checkpoints (`checkpoint`), the lock
(`lock`), saved networks (`saved_params`), results files and figures (`reporting`) and progress lines
(`progress`)."""
