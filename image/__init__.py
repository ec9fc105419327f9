"""FreeBSD appliance image builder: render each node's overlay, mtree, tar, makefs UFS, manifest."""
