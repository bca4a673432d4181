-- Views over a curator workspace, for DuckDB.
--
-- curator creates the relations catalog_raw, embeddings_raw, errors_raw, runs_raw and superseded_raw from the
-- Parquet parts that manifest.json lists (and predictions_<prompt set> per labelled prompt set)
-- before it runs this file; the `images` view is generated from the manifest (one column per
-- finding labelled so far). Without curator, the same data is at W/<dataset>/*.parquet:
--   SELECT * FROM read_parquet('W/catalog/*.parquet');

-- One row per source file: the newest version of each path. (Workspaces made by this version
-- list every replaced row in superseded_raw, and curator defines catalog as
--   SELECT c.* FROM catalog_raw AS c ANTI JOIN superseded_raw AS s ON s.image_id = c.image_id
-- which gives the same rows without ranking all of them; this ranking is the general form.)
CREATE OR REPLACE VIEW catalog AS
SELECT * EXCLUDE (_rank)
FROM (
    SELECT *, row_number() OVER (PARTITION BY path ORDER BY image_id DESC) AS _rank
    FROM catalog_raw
)
WHERE _rank = 1;

-- Normalised image embeddings of the current catalog rows, one per checkpoint.
CREATE OR REPLACE VIEW embeddings AS
SELECT e.*
FROM embeddings_raw AS e
SEMI JOIN catalog AS c ON c.image_id = e.image_id;

-- Files that could not be used: the latest error of each path, unless a later run catalogued it,
-- or closed it (stage 'resolved': a walk met the path again without an error, or `embed --prune`
-- found the failed file gone).
CREATE OR REPLACE VIEW errors AS
SELECT * EXCLUDE (_rank)
FROM (
    SELECT *, row_number() OVER (PARTITION BY path ORDER BY time DESC) AS _rank
    FROM errors_raw
) AS e
WHERE _rank = 1
  AND coalesce(stage, '') <> 'resolved'
  AND NOT EXISTS (SELECT 1 FROM catalog AS c WHERE c.path = e.path AND c.added_at >= e.time);

CREATE OR REPLACE VIEW runs AS
SELECT * FROM runs_raw;
