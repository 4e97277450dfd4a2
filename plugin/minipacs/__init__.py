"""minipacs: render, index and check every image that Orthanc stores.

The package never imports ``orthanc``: only ``plugin/minipacs_plugin.py`` (the script Orthanc
loads) does, so everything here is importable and testable in a plain Python process.
"""

__version__ = "0.1.0"
