"""Job name and labels: columns the job list filters on (copied from the spec at insert).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 08:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('labels', sa.JSON(), nullable=True))
        batch_op.create_index('ix_jobs_team_name', ['team_id', 'name'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_team_name')
        batch_op.drop_column('labels')
        batch_op.drop_column('name')
