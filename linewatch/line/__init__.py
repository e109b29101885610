"""The inspection daemon that runs on the line PC (torch-free): config, cameras, engine, verdicts, publishing."""
