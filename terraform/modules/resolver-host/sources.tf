# Secrets where AWS users keep them: Secrets Manager (the resolver's sm: backend, GetSecretValue)
# and Parameter Store (ssm:, GetParameter with decryption). The host reads the secrets and
# parameters it is given and nothing else; the KMS decrypt those services make for it is
# allowed only through them (kms:ViaService) and only for those secrets' and parameters'
# encryption context. And the SSM Agent's permissions, for Run Command (modules/fleet-rotation).

data "aws_caller_identity" "current" {}

locals {
  region  = data.aws_region.current.name
  account = data.aws_caller_identity.current.account_id

  # A secret's ARN ends in -XXXXXX (six characters Secrets Manager adds): NAME-?????? is exactly
  # the secret NAME; a pattern ending in * already covers the suffix.
  secret_arns = [
    for n in var.secretsmanager_secret_names :
    "arn:${data.aws_partition.current.partition}:secretsmanager:${local.region}:${local.account}:secret:${endswith(n, "*") ? n : "${n}-??????"}"
  ]
  # A parameter's ARN drops the leading / of a hierarchical name: /prod/db -> parameter/prod/db.
  parameter_arns = [
    for n in var.ssm_parameter_names :
    "arn:${data.aws_partition.current.partition}:ssm:${local.region}:${local.account}:parameter/${trimprefix(n, "/")}"
  ]

  sources_policy = length(local.secret_arns) + length(local.parameter_arns) > 0 || var.deny_unlisted_sources
}

data "aws_iam_policy_document" "sources" {
  count = local.sources_policy ? 1 : 0

  dynamic "statement" {
    for_each = length(local.secret_arns) > 0 ? [1] : []

    content {
      sid       = "ReadTheGivenSecrets"
      effect    = "Allow"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = local.secret_arns
    }
  }

  # GetParameter and GetParameters only: not GetParametersByPath (a whole subtree) nor
  # GetParameterHistory (every past value).
  dynamic "statement" {
    for_each = length(local.parameter_arns) > 0 ? [1] : []

    content {
      sid       = "ReadTheGivenParameters"
      effect    = "Allow"
      actions   = ["ssm:GetParameter", "ssm:GetParameters"]
      resources = local.parameter_arns
    }
  }

  # Secrets Manager decrypts a secret's data key with the encryption context
  # {"SecretARN": ARN, "SecretVersionId": ID}: only through Secrets Manager, only these secrets.
  dynamic "statement" {
    for_each = length(var.secrets_kms_key_arns) > 0 && length(local.secret_arns) > 0 ? [1] : []

    content {
      sid       = "DecryptTheGivenSecretsThroughSecretsManager"
      effect    = "Allow"
      actions   = ["kms:Decrypt"]
      resources = var.secrets_kms_key_arns

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["secretsmanager.${local.region}.amazonaws.com"]
      }

      condition {
        test     = "StringLike"
        variable = "kms:EncryptionContext:SecretARN"
        values   = local.secret_arns
      }
    }
  }

  # Parameter Store decrypts a SecureString with the encryption context
  # {"PARAMETER_ARN": ARN}: only through Parameter Store, only these parameters.
  dynamic "statement" {
    for_each = length(var.secrets_kms_key_arns) > 0 && length(local.parameter_arns) > 0 ? [1] : []

    content {
      sid       = "DecryptTheGivenParametersThroughParameterStore"
      effect    = "Allow"
      actions   = ["kms:Decrypt"]
      resources = var.secrets_kms_key_arns

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ssm.${local.region}.amazonaws.com"]
      }

      condition {
        test     = "StringLike"
        variable = "kms:EncryptionContext:PARAMETER_ARN"
        values   = local.parameter_arns
      }
    }
  }

  # Explicit denies: a broader policy attached later (AmazonSSMManagedInstanceCore allows
  # ssm:GetParameter and ssm:GetParameters on "*") cannot widen what the hosts read.
  dynamic "statement" {
    for_each = var.deny_unlisted_sources ? [1] : []

    content {
      sid           = "NeverOtherSecrets"
      effect        = "Deny"
      actions       = ["secretsmanager:GetSecretValue"]
      resources     = length(local.secret_arns) > 0 ? null : ["*"]
      not_resources = length(local.secret_arns) > 0 ? local.secret_arns : null
    }
  }

  dynamic "statement" {
    for_each = var.deny_unlisted_sources ? [1] : []

    content {
      sid           = "NeverOtherParameters"
      effect        = "Deny"
      actions       = ["ssm:GetParameter*"]
      resources     = length(local.parameter_arns) > 0 ? null : ["*"]
      not_resources = length(local.parameter_arns) > 0 ? local.parameter_arns : null
    }
  }
}

resource "aws_iam_role_policy" "sources" {
  count = local.sources_policy ? 1 : 0

  name   = "kmskeys-aws-sources"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.sources[0].json
}

# What the SSM Agent needs to register the instance and receive Run Command:
# AmazonSSMManagedInstanceCore without its ssm:GetParameter/GetParameters on every parameter,
# its inventory, compliance, patching and package actions.
data "aws_iam_policy_document" "ssm_agent" {
  count = var.enable_ssm_agent ? 1 : 0

  #checkov:skip=CKV_AWS_356:The agent's registration and message channels (ssm:UpdateInstanceInformation, ssm:ListInstanceAssociations, ec2messages:*, ssmmessages:*) are not scoped to a resource by IAM; the same "*" as AWS's AmazonSSMManagedInstanceCore, minus its reads.
  #checkov:skip=CKV_AWS_111:The write actions here are the agent's own heartbeat and message acknowledgements (UpdateInstanceInformation, SendReply, ...), which IAM does not scope to a resource.
  statement {
    sid    = "SsmAgentRunCommand"
    effect = "Allow"
    actions = [
      "ec2messages:AcknowledgeMessage",
      "ec2messages:DeleteMessage",
      "ec2messages:FailMessage",
      "ec2messages:GetEndpoint",
      "ec2messages:GetMessages",
      "ec2messages:SendReply",
      "ssm:DescribeAssociation",
      "ssm:ListInstanceAssociations",
      "ssm:UpdateInstanceAssociationStatus",
      "ssm:UpdateInstanceInformation",
      "ssmmessages:CreateControlChannel",
      "ssmmessages:CreateDataChannel",
      "ssmmessages:OpenControlChannel",
      "ssmmessages:OpenDataChannel",
    ]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "ssm_agent" {
  count = var.enable_ssm_agent ? 1 : 0

  name   = "kmskeys-ssm-agent"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.ssm_agent[0].json
}
