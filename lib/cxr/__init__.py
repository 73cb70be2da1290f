"""cxr: COVID-19 detection in chest X-rays with deep transfer learning, on Ray.

A research tool, not a medical device.
"""

__version__ = "0.1.0"
