-- The first schema: processes, their plans, checkpoints and cycles, the
-- workers that take part, their assignments and their reports.
-- Times are Unix seconds (UTC) stored as REAL; configs are JSON text.

CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE processes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    client_config TEXT NOT NULL,
    server_config TEXT NOT NULL,
    averaging_plan BLOB,
    created_at REAL NOT NULL,
    completed_at REAL,
    UNIQUE (name, version)
);

CREATE TABLE plans (
    id INTEGER PRIMARY KEY,
    process_id INTEGER NOT NULL REFERENCES processes (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value BLOB NOT NULL,
    UNIQUE (process_id, name)
);

CREATE TABLE protocols (
    id INTEGER PRIMARY KEY,
    process_id INTEGER NOT NULL REFERENCES processes (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value BLOB NOT NULL,
    UNIQUE (process_id, name)
);

-- Checkpoints are immutable once written and numbered from 1 per process.
CREATE TABLE checkpoints (
    id INTEGER PRIMARY KEY,
    process_id INTEGER NOT NULL REFERENCES processes (id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    value BLOB NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (process_id, number)
);

-- A cycle trains on checkpoint_number; closing it writes the next one.
CREATE TABLE cycles (
    id INTEGER PRIMARY KEY,
    process_id INTEGER NOT NULL REFERENCES processes (id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    checkpoint_number INTEGER NOT NULL,
    started_at REAL NOT NULL,
    deadline_at REAL NOT NULL,
    closed_at REAL,
    diffs_averaged INTEGER,
    UNIQUE (process_id, number)
);

CREATE INDEX cycles_open ON cycles (process_id) WHERE closed_at IS NULL;

-- A worker belongs to one process; subject is the JWT "sub" when there is one.
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    process_id INTEGER NOT NULL REFERENCES processes (id) ON DELETE CASCADE,
    subject TEXT,
    created_at REAL NOT NULL,
    UNIQUE (process_id, subject)
);

CREATE TABLE assignments (
    id INTEGER PRIMARY KEY,
    cycle_id INTEGER NOT NULL REFERENCES cycles (id) ON DELETE CASCADE,
    worker_id TEXT NOT NULL REFERENCES workers (id) ON DELETE CASCADE,
    request_key TEXT NOT NULL UNIQUE,
    assigned_at REAL NOT NULL,
    UNIQUE (cycle_id, worker_id)
);

-- One report per assignment; digest is SHA-256 of the diff, so that a retried
-- report can be recognised without comparing the whole blob.
CREATE TABLE reports (
    assignment_id INTEGER PRIMARY KEY REFERENCES assignments (id) ON DELETE CASCADE,
    cycle_id INTEGER NOT NULL REFERENCES cycles (id) ON DELETE CASCADE,
    diff BLOB NOT NULL,
    digest BLOB NOT NULL,
    num_samples INTEGER NOT NULL,
    metrics TEXT,
    reported_at REAL NOT NULL
);

CREATE INDEX reports_by_cycle ON reports (cycle_id);
