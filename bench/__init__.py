"""The pull benchmark: realistic images, skopeo+umoci+mksquashfs against ``imagegw pull``.

Run it with ``bench/run`` (see the README). Not part of the installed product.
"""
