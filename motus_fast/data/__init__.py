"""Data: readers (LeRobot v3, upstream RoboTwin layout), windows, image prep, norm stats, mixtures, synthetic."""
