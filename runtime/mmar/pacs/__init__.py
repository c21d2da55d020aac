"""DICOMweb: pull studies from a PACS (QIDO-RS, WADO-RS), write segmentations as DICOM SEG, push them back
(STOW-RS).

  client     the connection: credentials from the environment only, bounded retries with back-off, every
             failure as one readable line that never carries a credential
  query      QIDO-RS: the series a study-UID list or an attribute query matches
  retrieve   WADO-RS: the instances of a series onto disk, atomically, resuming by SOPInstanceUID
  datalist   the pulled series as datalist entries (image, source series, UIDs, optional label)
  seg        a NIfTI mask -> a DICOM Segmentation on the source series' grid (highdicom)
  store      STOW-RS of SEG files, skipping those the server already holds

Imported only by `mmar pull`, `mmar push` and `mmar infer --dicom-seg`.
"""
