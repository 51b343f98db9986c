"""The ``selva`` command line. It sits above every package (selva, preprocessing, pipelines,
training) so that the model library never imports the jobs that use it (DESIGN §2)."""
