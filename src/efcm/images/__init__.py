"""Images for the image-level path (issue 16): the sibling of `efcm.slides` for retina and chest
X-ray images.

- `decode`: the bytes of a PNG, JPEG, TIFF (8/16-bit) or DICOM file -> a uint8 grey or RGB array,
  with typed errors (`efcm.errors.InvalidImage`) that name the file and the problem;
- `dicom`: DICOM pixels with pydicom (rescale, the file's window, MONOCHROME1 inverted), and the
  writer the demo and the tests use;
- `preprocess`: the task's preprocessing (`image` params): fundus field-of-view crop, channels,
  resize policy, to the uint8 (size, size, 3) array the encoders' `PatchTransform` takes;
- `reader`: a manifest's image (local path or gs://, staged through the slide cache) read and
  preprocessed (`ImageReader`), and the per-image batch loop (`image_loop`, the slides'
  `SlideLoop` keyed by image_id);
- `synthetic`: the deterministic demo sets (`efcm demo-data --kind fundus|cxr`).

This package sits at the slides' layer and may use the slides' batch loop (`efcm.slides.batch`);
the slides never import it.
"""
