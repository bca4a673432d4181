-- Every image whose (ensemble) edema probability passes a threshold, highest first.
-- Run with: curator sql --workspace W "$(cat sql/cohorts/edema.sql)"
-- The threshold defaults to 0.5; set it with: curator sql --set threshold=0.52 ...
-- Its rows are identified (paths, patient IDs, dates): for this machine. To hand a cohort to others,
-- use `curator cohort` (a de-identified export by default).
SELECT image_id, path, patient_id, study_instance_uid, view_position, study_date, edema
FROM images
WHERE edema >= coalesce(getvariable('threshold'), 0.5)
ORDER BY edema DESC, image_id;
