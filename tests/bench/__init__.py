"""`make bench`: one table, measured in one run, ratios first (docs/design.md budgets)."""
