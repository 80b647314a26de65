"""lm-eval task configs of the offline tasks (base YAMLs) and their scoring functions (utils.py)."""
