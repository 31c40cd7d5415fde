"""Judge-free evaluation on the synthetic data's held-out split: the rule-based checker (`checker`), the task
suites (`suites`), `bagel-eval` / `evaluate()` (`run`) and the emergence harness (`emergence`)."""
