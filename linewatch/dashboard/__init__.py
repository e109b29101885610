"""The operator's web page (`linewatch dashboard`): a separate process that subscribes to the daemon's results and
previews and serves them to a browser. Needs `pip install 'linewatch[dashboard]'`."""
