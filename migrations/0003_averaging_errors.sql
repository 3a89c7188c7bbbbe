-- Hosted averaging plans: a cycle whose averaging plan failed closes without
-- a new checkpoint, and keeps the reason here for GET /status.

ALTER TABLE cycles ADD COLUMN averaging_error TEXT;
