-- Each large blob moves to the last column of its row. SQLite then stores a
-- zeroblob there without building it, and the server writes and reads the
-- bytes in place through incremental blob I/O, never holding another copy
-- of a checkpoint or a diff in memory.

CREATE TABLE checkpoints_new (
    id INTEGER PRIMARY KEY,
    process_id INTEGER NOT NULL REFERENCES processes (id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    created_at REAL NOT NULL,
    value BLOB NOT NULL,
    UNIQUE (process_id, number)
);

INSERT INTO checkpoints_new (id, process_id, number, created_at, value)
SELECT id, process_id, number, created_at, value FROM checkpoints;

DROP TABLE checkpoints;

ALTER TABLE checkpoints_new RENAME TO checkpoints;

CREATE TABLE reports_new (
    assignment_id INTEGER PRIMARY KEY REFERENCES assignments (id) ON DELETE CASCADE,
    cycle_id INTEGER NOT NULL REFERENCES cycles (id) ON DELETE CASCADE,
    digest BLOB NOT NULL,
    num_samples INTEGER NOT NULL,
    metrics TEXT,
    reported_at REAL NOT NULL,
    diff BLOB NOT NULL
);

INSERT INTO reports_new (
    assignment_id,
    cycle_id,
    digest,
    num_samples,
    metrics,
    reported_at,
    diff
)
SELECT assignment_id, cycle_id, digest, num_samples, metrics, reported_at, diff
FROM reports;

DROP TABLE reports;

ALTER TABLE reports_new RENAME TO reports;

CREATE INDEX reports_by_cycle ON reports (cycle_id);
