"""cotune.report"""
