"""One module per dashboard page; each holds one ``dashboard.pages.base.Page`` (a ``pn.viewable.Viewer``)."""
