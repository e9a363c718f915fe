-- Cutout's columns: which job wrote the row, and when that job was submitted,
-- so a retried job applies once and an older job never overwrites a newer one.
ALTER TABLE data_records
  ADD COLUMN IF NOT EXISTS job_id CHAR(32) NULL AFTER processed_at,
  ADD COLUMN IF NOT EXISTS job_created_ms BIGINT NULL AFTER job_id;
-- One row per (vendor, project, record): what the upsert keys on.
CREATE UNIQUE INDEX IF NOT EXISTS uq_data_records_record
  ON data_records (vendor_id, project_id, record_id);
