"""lm-eval task definitions of UniSD (one folder per benchmark); ``_common`` holds their shared hooks.

Use them from lm-eval directly: ``lm_eval --include_path harness/evaluation/tasks --tasks unisd_scienceqa``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
