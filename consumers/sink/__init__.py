"""Every event into ClickHouse, and the queries over it.

:mod:`.tables` maps events to rows, :mod:`.store` writes and reads them (chDB Parquet parts or a
server), :mod:`.service` is the ``stormline sink`` process, :mod:`.analytics` the canned queries.
"""
