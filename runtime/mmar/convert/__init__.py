"""DICOM / NIfTI / MHA -> NIfTI (or MHA) conversion: `mmar convert`, alias `nvmidl-dataconvert`.

Data flows one way:
  discover (find files, read DICOM headers, group into series)
  -> dicom (header records -> a volume plan: slice order, grid, warnings; then pixels -> array)
  -> resample (optional -r) -> write (stable names, never overwrite without -f, temp file + rename).
`cli` only parses flags, fans the jobs out over processes and prints the summary.
"""
