"""`make bench`: one table, measured in one run, ratios first (DESIGN.md budgets)."""
