"""The report of a run (report.md, report.html, figures), rendered from results.json alone."""
