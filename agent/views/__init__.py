"""Views shared by every surface (the CLI tables, the machine formats, the sweep report, the dashboard).

``records`` builds plain records once from rows and hunt results (pure functions);
``table`` and ``progress`` render them for a terminal with rich. Surfaces never rebuild
the records themselves, so a finding looks the same wherever it is shown.
"""
