"""The dashboard's files (plain ES modules), served by the server; uPlot comes from npm."""
