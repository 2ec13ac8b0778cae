"""The page base class and the dashboard's one lazy-render mechanism.

A page is a :class:`pn.viewable.Viewer` over the session's :class:`~dashboard.state.AppState`. It builds its
layout the first time it is shown (``__panel__``), and work that only the visible page needs goes through
:meth:`Page.when_shown`: run now if the page is shown, else once when it is next shown (a run switch or filter
change costs nothing on hidden pages). :meth:`Page.live` is a container re-rendered that way.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import panel as pn
import param

from dashboard.pages.common import run_banner
from dashboard.safe import esc
from dashboard.state import AppState


def drawing_failed(title: str, run_id, e: Exception) -> pn.pane.Alert:
    """One line for a page that could not be drawn from a run's files (a damaged or hand-edited store)."""
    import logging

    logging.getLogger("dashboard").exception("%s page of run %s", title, run_id)
    return pn.pane.Alert(f"The {esc(title)} page could not be drawn for run <code>{esc(run_id)}</code>: "
                         f"{esc(type(e).__name__)}: {esc(e)}. Its files may be damaged or edited by hand; the other "
                         "runs are not affected.", alert_type="danger", css_classes=["wbc-draw-failed"],
                         sizing_mode="stretch_width")


class Page(pn.viewable.Viewer):
    title: ClassVar[str] = ""  # the tab's name (AppState.page)
    css: ClassVar[str] = ""  # the page's CSS class (tests and the browser walk find it by this)

    state = param.ClassSelector(class_=AppState, constant=True, doc="The session's shared state.")

    def __init__(self, state: AppState, **params):
        super().__init__(state=state, **params)
        self._pending: list[Callable[[], None]] = []
        self._layout = None
        self.state.param.watch(self._on_page, "page")

    def __panel__(self):
        if self._layout is None:
            self._layout = pn.Column(*self.layout(), sizing_mode="stretch_width", css_classes=[self.css])
        return self._layout

    def layout(self) -> list:
        """The page's parts, top to bottom (built once)."""
        raise NotImplementedError

    @property
    def shown(self) -> bool:
        return self.state.page == self.title

    def when_shown(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` now if this page is shown; else once, the next time it is shown."""
        if self.shown:
            fn()
        elif fn not in self._pending:
            self._pending.append(fn)

    def _on_page(self, event) -> None:
        if event.new == self.title and self._pending:
            pending, self._pending = self._pending, []
            for fn in pending:
                fn()

    def live(self, render: Callable[[], pn.viewable.Viewable], *watch: tuple, banner: bool = False) -> pn.Column:
        """A container holding ``render()``, drawn now and again (via :meth:`when_shown`) whenever one of the
        watched parameters changes; ``watch`` items are (parameterized object, [parameter names]). With
        ``banner``, a run that is not finished says so above (or instead, if it has nothing to show); on a page that
        watches ``compare_run_id``, the compared run too."""
        holder = pn.Column(sizing_mode="stretch_width")

        both = any("compare_run_id" in names for _, names in watch)  # a page that shows the compared run too

        def draw():
            try:
                holder.objects = [self._with_banner(render, both) if banner else render()]
            except Exception as e:  # data no check foresaw: said on the page, not a blank or a stale one
                holder.objects = [drawing_failed(self.title, self.state.run_id, e)]

        for obj, names in watch:
            obj.param.watch(lambda *_: self.when_shown(draw), names)
        draw()
        return holder

    def _with_banner(self, render, both: bool = False):
        note, show = run_banner(self.state, self.state.run_id)
        compare = self.state.compare_run_id if both else None
        other = run_banner(self.state, compare)[0] if compare and compare != self.state.run_id else None
        notes = [n for n in (note, other) if n is not None]  # the compared run says so too when it is not finished
        if not notes:
            return render()
        return pn.Column(*notes, render(), sizing_mode="stretch_width") if show else pn.Column(*notes)
