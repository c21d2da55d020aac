"""DICOM / NIfTI / MHA -> NIfTI (or MHA) conversion: `mmar convert`, alias `nvmidl-dataconvert`.

Data flows one way:
  discover (find files, read DICOM headers once: `header` decodes only the needed elements, pydicom the
  files it leaves; group into series; `mosaic` splits Siemens mosaics)
  -> dicom (header records -> a volume plan: slice order, grid, warnings; then pixels -> array: read
     straight from the file, `encapsulated` for lossless compressed ones, pydicom for the rest)
  -> layout (dcm2niix's voxel order) -> resample (optional -r)
  -> write (NIfTI straight from numpy, stable names, never overwrite without -f, temp file + rename)
  -> sidecar (optional -b: BIDS JSON, .bval/.bvec).
`cli` only parses flags, fans the jobs out over processes and prints the summary.
"""
