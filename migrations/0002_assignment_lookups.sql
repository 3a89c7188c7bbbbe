-- Admission looks up a worker's latest cycle (the reuse rule) and counts a
-- cycle's assignments (max_workers); both were full scans.

CREATE INDEX assignments_by_worker ON assignments (worker_id);

CREATE INDEX assignments_by_cycle ON assignments (cycle_id);
