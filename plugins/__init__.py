"""In-tree scheme plugins, each loaded through the ``secureinfer`` entry-point group."""
