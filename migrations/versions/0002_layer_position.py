"""layer_metrics.position: depth index of the weight matrix (null for rows written before it).

Also an index on (job_id, step, position, layer), the order GET /v1/jobs/{id}/metrics/layers reads in.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 08:10:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('layer_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('position', sa.Integer(), nullable=True))
        batch_op.create_index('ix_layer_metrics_job_step_position', ['job_id', 'step', 'position', 'layer'],
                              unique=False)


def downgrade():
    with op.batch_alter_table('layer_metrics', schema=None) as batch_op:
        batch_op.drop_index('ix_layer_metrics_job_step_position')
        batch_op.drop_column('position')
