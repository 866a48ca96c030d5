"""fisherlib test suite (a package, so that helper modules import as ``tests._backends``)."""
