-- The old system's table, as it was: one row per vendor record with a photo.
CREATE TABLE IF NOT EXISTS data_records (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  vendor_id VARCHAR(64) NOT NULL,
  project_id VARCHAR(64) NOT NULL,
  record_id VARCHAR(64) NOT NULL,
  photo_url VARCHAR(2048) NULL,
  processing_status VARCHAR(32) NOT NULL DEFAULT 'pending',
  processed_at DATETIME(6) NULL,
  created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
