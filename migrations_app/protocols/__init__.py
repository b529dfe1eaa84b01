"""Protocol history migration (seed 003): classifiers, the CAS cursor, the live producer, the history
and current-state backfills, and their operator surfaces."""
