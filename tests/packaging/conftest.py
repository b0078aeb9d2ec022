from tests.packaging.rpmtools import project_rpm  # noqa: F401  (pytest fixture)
